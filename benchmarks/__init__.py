"""devicekit's benchmarks: peers side by side, medians and ratios, printed as tables."""
