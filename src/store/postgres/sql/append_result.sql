select (select last_seq from s) as last_seq, exists (select 1 from sessions x
  where x.tenant = $1 and x.id = $2 and (x.expires_at is null or x.expires_at > now())) as found
