"""The HDF5 embedding cache, the contract between the stages: its format, the writer (stage one), the
reader (stage two), verify, and the columnar index. The only folder that imports h5py.
"""
