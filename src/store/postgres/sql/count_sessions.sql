select count(*) from sessions s where s.tenant = $1 and (s.expires_at is null or s.expires_at > now())
