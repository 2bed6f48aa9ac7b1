from fewstep.cli import run

run()
