"""Repository tools (not part of the installed package): each file says how to run it; the tests
import :mod:`scripts.plot_dashboard`."""
