"""What a run reports: metrics.jsonl and the progress bar (metrics.py), the trackers Accelerate offers
(trackers.py), and loss.png (plots.py)."""
