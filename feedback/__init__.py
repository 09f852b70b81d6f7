"""feedback/: the vote stream (Redis Streams, consumer groups) and the preference archive."""
