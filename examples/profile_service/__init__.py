"""A small profile service: Flask in front, Redis behind, failed writes replayed by Celery."""
