"""Delivery: couriers that take one message to an upstream provider (smarthost.py, mx.py),
how their replies are classified (errors.py, transaction.py), and the routes that choose
them (routing.py). When to deliver, and what an outcome means for the message, is the
queue's (relay/queue/).

Nothing outside this package imports aiosmtplib or dnspython.
"""
