"""Real-world input: what turns photos, scans and canvases into answers (the pattern language for read strings so
far; preprocessing, segmentation and the recognizer move here as the package is split into its wings)."""
