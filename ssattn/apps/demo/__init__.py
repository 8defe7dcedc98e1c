"""The demo's pieces: the experiment (three models over seeds), its results (tables, verdict) and its figures."""
