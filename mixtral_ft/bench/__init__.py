"""`mixtral-ft bench`: throughput and memory of full-width Mixtral with our NF4 experts. The peers it is
compared against live outside the package, in benchmarks/."""
