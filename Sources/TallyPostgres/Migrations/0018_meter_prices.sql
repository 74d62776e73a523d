-- Price books may price meters (issue #24): a meter's charge is a rated_usage row whose
-- token_type is 'meter' and whose model column names the meter; invoices show it the same way.
ALTER TABLE tally.rated_usage DROP CONSTRAINT rated_usage_token_type_check;
ALTER TABLE tally.rated_usage ADD CONSTRAINT rated_usage_token_type_check
    CHECK (token_type IN ('input', 'output', 'cache_read', 'cache_write', 'cache_write_1h', 'reasoning', 'meter'));
