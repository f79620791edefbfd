"""Moving deltas to and from other libraries' formats."""
