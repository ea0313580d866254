select count(*) from sessions where tenant = ?1 and (expires_at is null or expires_at > ?2)
