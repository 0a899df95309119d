"""The attack lab: a leaf segment in network namespaces (`topology`), the cases of real tools run against it
(`cases`), and how a case is captured and judged (`runner`). ``tests/lab`` runs it in CI;
``benchmarks/detections.py`` makes the scorecard from it."""
