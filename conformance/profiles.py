"""The suite's hypothesis profiles, as data (the CLI lists them without importing hypothesis or pytest)."""

# Hypothesis profiles of the suite, registered and loaded only for a conformance run. "ci": the same examples
# every run (derandomize) and a bound on their number, so the suite's time is known; "thorough": the GPU
# profile's counts, and deep argument fuzzing (ARGUMENT_FUZZ_EXAMPLES drawn calls per family), for a one-off
# audit rather than CI.
PROFILES = {
    "dev": {"max_examples": 20},
    "ci": {"max_examples": 12, "derandomize": True, "print_blob": True},
    "gpu": {"max_examples": 40},
    "thorough": {"max_examples": 40},
}
ARGUMENT_FUZZ_EXAMPLES = {"thorough": 1000}
