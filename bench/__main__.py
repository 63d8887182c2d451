from bench.cli import app
from common.cli import run

run(app, "bench")
