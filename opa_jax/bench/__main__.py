"""A benchmark child process: `python -m opa_jax.bench JOB` prints one JSON line."""

import json
import sys

from opa_jax.bench import children

print(json.dumps(children.run_job(json.loads(sys.argv[1]))))
