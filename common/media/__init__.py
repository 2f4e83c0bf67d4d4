"""Pure media kernels shared by edge ingest and cloud curation (no I/O): shot detection, audio features, quality."""
