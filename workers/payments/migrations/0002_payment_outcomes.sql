-- The figures of each outcome, so that a repeated command answers with
-- exactly the event it answered first.
--
-- payments.status: authorized -> refunded, declined, or voided (a refund
-- arrived before any authorization: the order can no longer be charged).
-- payments.reason: why it was declined.
ALTER TABLE payments ADD COLUMN authorized_balance_cents BIGINT; -- balance right after the authorization
ALTER TABLE payments ADD COLUMN refunded_balance_cents BIGINT;   -- balance right after the refund
ALTER TABLE payments ADD COLUMN refund_reason TEXT;
