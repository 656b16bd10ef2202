"""Recipes that made what samcache ships; not part of the installed package."""
