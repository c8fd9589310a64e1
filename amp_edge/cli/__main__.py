"""python -m amp_edge.cli"""

from amp_edge.cli import run

run()
