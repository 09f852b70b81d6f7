"""feedback/: the vote stream (Redis Streams, consumer groups) and the preference archive.

    vote_record      the vote record (the contract with the gateway)
    vote_stream      stream names and the producer (XADD)
    stream_consumer  one consumer-group member: read, process, XACK, re-claim, dead-letter
    consumers        archiver, ranker, learner trigger, chat archiver; run_consumers()
    dead_letters     entries no group could process: list, replay (`arena dead-letters`)
    refit            the periodic Bradley-Terry refit from the archive's pair counts
    archive          SQLAlchemy Core tables on SQLite / PostgreSQL, insert-or-ignore
    stats            stream and archive figures for /healthz and /metrics
    export           the preference dataset (TRL conversational format), JSONL / Parquet
    synthetic        synthetic votes for tests and benchmarks
"""
