"""`samcache serve`: a local web app over a cache (session.py: what a request may do; app.py: HTTP)."""
