from mla_runner.cli import run

run()
