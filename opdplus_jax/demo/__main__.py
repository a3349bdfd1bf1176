"""`python -m opdplus_jax.demo`: see `opdplus_jax.demo`."""

from opdplus_jax.demo.main import main

if __name__ == "__main__":
    main()
