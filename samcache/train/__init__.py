"""Stage two: the decoder trained from the cache (samples, steps, the interactive recipe, validation,
the run folder).
"""
