"""``celery -A proj redis-retry ui``: the operator's web page (live figures and the dead-letter topic).

Needs the ``ui`` extra (``pip install 'celery-redis-retry[ui]'``: Starlette and uvicorn).
:mod:`.feed` collects the figures, :mod:`.records` shapes DLQ records for the page,
:mod:`.server` serves the page, its JSON API and the access rules.
"""
