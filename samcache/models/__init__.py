"""What a model is: the families (families.py) and everything they are built from, weights found and
loaded safely, preprocessing, prompts, and the batched decoder with its losses.
"""
