delete from sessions where tenant = $1 and id = $2
returning (expires_at is null or expires_at > now()) as live
