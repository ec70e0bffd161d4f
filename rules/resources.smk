# Every rule declares `threads:` and `resources: **RES[rule]`: memory from the size of its inputs (the model
# dominates) and a runtime limit, for cluster executors (profiles/slurm). The table: parity_both/cluster.py.
from parity_both.cluster import RES
