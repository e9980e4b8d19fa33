"""What test modules share: the stack (stack.py), its servers and variants, the job and batch
bodies, reading the API's answers, media made on the spot, a webhook receiver. Test modules import
from here, never from one another (tests/test_suite_layout.py checks it)."""
