"""Stage one: each image through the encoder once, into the cache."""
