"""Everything that touches Redis or the bytes stored in it."""
