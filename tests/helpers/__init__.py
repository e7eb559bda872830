"""What test modules share besides fixtures (those stay in tests/conftest.py).

A test module imports its helpers from here, never from another test module
(tests/test_imports.py checks): tests.helpers.workflow runs the workflow,
tests.helpers.archives builds tiny CIFAR archives, tests.helpers.losses holds
the hand references of the loss tests, tests.helpers.hostile writes crafted
pickles, image trees and hostile archives, and tests.helpers.childmem runs a
step in a child process under a memory cap and reports its peak.
"""
