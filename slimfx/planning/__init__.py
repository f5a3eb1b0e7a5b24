"""Decision configs, the budget problem, solvers and Plan. Plain Python + numpy/scipy."""
