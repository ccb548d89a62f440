"""The activation store, beneath every stage: the Zarr layout and writer (store.py), verification
on use (verify.py), per-layer statistics (stats.py) and the training loader (loader.py)."""
