"""The engine core's tests, written once here and vendored with the core into every export's
`tests/core_<package>/` (`python -m harness.vendor_core`), where they run in the export's own suite against its
package. Not runnable from here: each export's `engine_fixture.py` (not vendored) names the engine under test."""
