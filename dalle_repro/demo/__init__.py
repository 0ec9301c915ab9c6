"""The demo: the whole pipeline on synthetic data, its time plan and its report."""
