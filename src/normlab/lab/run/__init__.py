"""One lab run: what determines it and what it returns (``config``), the protocol that says
which runs compare (``protocol``), the one training loop (``loop``) with seeds packed side by
side (``packed``), the entry points (``train``) and a user's model as the loop's builder
(``user_builder``).
"""
