"""Dataset folders, image reading and checks, captions, buckets and caches."""
