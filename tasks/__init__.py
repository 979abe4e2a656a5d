"""falflow's tasks: plain async functions for each step, with thin Prefect tasks over them."""
