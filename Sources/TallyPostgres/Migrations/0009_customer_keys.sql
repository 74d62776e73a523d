-- Keys held by one customer: the gateway (POST /v1/chat/completions, /v1/responses, /v1/messages)
-- meters and checks credit for the key's customer (tally keys create --customer C).
ALTER TABLE tally.api_keys ADD COLUMN customer_id text;
