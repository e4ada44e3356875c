"""Data tools: corpora made for measuring the data pipeline at full scale."""
