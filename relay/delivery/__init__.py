"""Delivery: couriers that take one message to an upstream provider (smarthost.py, mx.py),
how their replies are classified (errors.py, transaction.py), the routes that choose
them (routing.py), and which smarthosts are worth a connection right now (health.py).
When to deliver, and what an outcome means for the message, is the queue's (relay/queue/).

Nothing outside this package imports aiosmtplib or dnspython.
"""
