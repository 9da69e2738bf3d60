"""A FastAPI service writing to Redis through a wrapped ``redis.asyncio`` client."""
