"""Datasets in, records out: COCO JSON, mask folders and synthetic stamps as `ImageRecord`s; images
decoded to RGB; masks as COCO RLE and their scores.
"""
