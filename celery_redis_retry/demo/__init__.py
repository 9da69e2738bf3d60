"""``make demo``: the whole flow on this machine, with a Redis outage and its recovery.

Run it with ``python -m celery_redis_retry.demo [--rate N] [--duration S] [--ops N]
[--outage-seconds S] [--keep-logs]``. The modules, in the order the demo uses them:

    app      the Celery app the worker and the bridge run (``celery -A celery_redis_retry.demo.app``)
    story    the web app's writes, through ``wrap()`` and ``on_failure``, and what each must leave
    run      starts the processes, plays the story, kills and restarts Redis, waits for the drain
    verify   checks every write against Redis, the topic and the DLQ topic
    console  the live status line, the progress bar and the final table
"""
