"""Reports: the CSV/JSONL writer and resume reading, summaries, merge, heatmaps."""
