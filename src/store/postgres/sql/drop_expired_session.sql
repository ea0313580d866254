delete from sessions where tenant = $1 and id = $2 and expires_at <= now()
