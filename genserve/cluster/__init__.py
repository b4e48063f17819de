"""Scale-out: many GenServe nodes sharing one Redis (issue 15). ``redis_queue`` holds the global job queue."""
