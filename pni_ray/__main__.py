"""`python -m pni_ray ...` runs the `pni-ray` command (where the console script is not on PATH)."""

from pni_ray.cli import main

if __name__ == "__main__":
    main(prog_name="pni-ray")
