# The two commands of the README. The work is done by the scripts in .ci/,
# which CI runs too (.ci/run is `make test`).

.PHONY: demo test

# Extra options for the demo, e.g. `make demo ARGS="--port 8001 --no-nodes"`.
ARGS ?=

demo:
	@bash .ci/bootstrap
	.venv/bin/python manage.py demo $(ARGS)

# Extra pytest options, e.g. `make test PYTEST_ARGS="-k agent -x"`.
PYTEST_ARGS ?=

test:
	@bash .ci/test $(PYTEST_ARGS)
