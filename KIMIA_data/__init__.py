"""Data preparation: data_process.py (any source -> KIMIA_data/train, test) and synthetic.py."""
